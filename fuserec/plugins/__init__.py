"""Built-in algorithms. Each is registered in pyproject.toml's entry points like a third party's."""
