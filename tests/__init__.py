"""The test suite; also `python -m tests.contract path/to/my_gpt.py:MyGPT` (check_model.py)."""
