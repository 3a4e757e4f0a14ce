"""Fine-tuning BAGEL: the components `examples/finetune.py` drives, one job a module (which owns
what: docs/training.md, Fine-tuning).

Not remote code: nothing `from_pretrained` loads imports this package (tests/test_layout.py checks
it). Its modules import the root modules relatively (`from ..modeling_bagel import ...`), so the
checkout is imported as a package (`scripts/repo_package.py`: `bagel_remote.training`).
"""
