"""Built-in export formats (``hybridize export --format NAME``), registered through the ``hybridize`` entry points."""
