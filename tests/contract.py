"""The contract checks as `python -m tests.contract path/to/my_gpt.py:MyGPT`: the same command
as `python check_model.py`, under the name the test suite gives it (tests/test_contract.py runs
the checks on our model and on deliberately broken ones)."""
import sys

from check_model import main
from cli import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
