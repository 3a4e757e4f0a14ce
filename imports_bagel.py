"""Import-time noise of third-party packages, silenced where BAGEL's modules cause it.

transformers' `modeling_utils` (imported by `PreTrainedModel` and by `processing_utils`) imports
torchao when it is installed, which prints on every run:
- torch >= 2.10's deprecation warning for each Enum torchao registers as a pytree constant
  (torch/utils/_pytree.py, "is an Enum subclass and is now natively supported by torch.compile");
- on a torch build without CUDA, "Failed to load .../torchao/_C....so" for its CUDA kernels, which
  such a build cannot run anyway.
Nothing a BAGEL user can act on, so those records alone are dropped while BAGEL's modules import
transformers; other warnings, and the same ones from anyone else's import, pass.
"""

from __future__ import annotations

import contextlib
import logging

import torch


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


@contextlib.contextmanager
def quiet_third_party_imports():
    """Imports inside this block do not print the warnings above."""
    drops = [("torch.utils._pytree", _Drop("is an Enum subclass and is now natively supported by torch.compile"))]
    if torch.version.cuda is None:
        drops.append(("torchao", _Drop("Failed to load")))
    for name, drop in drops:
        logging.getLogger(name).addFilter(drop)
    try:
        yield
    finally:
        for name, drop in drops:
            logging.getLogger(name).removeFilter(drop)
