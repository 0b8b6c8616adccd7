"""Model registry: name -> factory. Models return `tfd.Distribution` objects."""
