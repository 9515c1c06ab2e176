"""Features the pipeline calls, one module each: long-passage chunking, the score cache."""
