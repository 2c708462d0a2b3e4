"""README's code blocks run as written (in one namespace, in order): the taste of the API stays true."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readmes_python_blocks_run_as_written():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2   # the layer taste and the check of your own layer
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
