"""Built-in hybridize plugins. Each module is registered through the `hybridize` entry-point group."""
