"""experiments.train.device (the CPU allocator): glibc keeps freed blocks after retain_freed_memory, and only then.

Each check runs in a fresh interpreter, so the test process's own allocator is left alone.
"""
import subprocess
import sys
import textwrap

import pytest

from experiments.train import device as cpu_allocator

_GLIBC = cpu_allocator._libc() is not None

# Allocate and free a 256 MiB tensor, then report how much resident memory went back to the OS.
_PROBE = textwrap.dedent("""
    import sys, torch
    from experiments.train import device as cpu_allocator
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    applied = cpu_allocator.retain_freed_memory() if sys.argv[1] == "retain" else False
    x = torch.ones(64 << 20)          # 256 MiB, every page touched
    held = rss()
    del x
    print(applied, (held - rss()) / 2**20)
""")


def _probe(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True, capture_output=True,
                         text=True).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not _GLIBC, reason="needs Linux with glibc")
def test_default_allocator_returns_a_large_block_and_retain_keeps_it():
    applied, returned_default = _probe("default")
    assert applied == "False" and returned_default > 200      # munmap'd on free: ~256 MiB back
    applied, returned_retained = _probe("retain")
    assert applied == "True" and returned_retained < 16       # kept in the heap for the next step


def test_retain_refuses_a_negative_pad():
    with pytest.raises(ValueError, match="top_pad_mib >= 0"):
        cpu_allocator.retain_freed_memory(-1)

