"""Built-in fusers, registered in pyproject.toml under ``fuserec.fusers`` like any third party's."""
