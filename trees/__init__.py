"""Pytree helpers shared by ``nets`` and ``optim``: the "/"-joined leaf paths (see
:mod:`trees.paths`) and the member dimension of stacked trees (:mod:`trees.members`). Imports torch and the standard library only."""
from .members import as_members, first_member
from .paths import (SEP, check_dict_key, children, is_container, is_namedtuple, is_within, join,
                    key_name, leaf_paths, leaves_with_paths, map_with_path, path_of, rebuild, show)

__all__ = ["SEP", "join", "key_name", "path_of", "leaf_paths", "is_within", "show",
           "is_namedtuple", "is_container", "check_dict_key", "children", "leaves_with_paths",
           "rebuild", "map_with_path", "first_member", "as_members"]
