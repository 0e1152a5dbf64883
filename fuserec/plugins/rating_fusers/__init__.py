"""Built-in rating fusers (entry-point group ``fuserec.rating_fusers``), one module each."""
