"""The serving core: admission, the scoring pipeline, the queue and its worker. No web imports."""
