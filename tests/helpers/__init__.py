"""Scripts the tests run in other processes (torchrun workers); not collected as tests."""
