"""Built-in rating-prediction plugins (entry-point group ``fuserec.raters``), one module each."""
