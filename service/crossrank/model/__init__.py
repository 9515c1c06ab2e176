"""The model: its directory (the export contract), tokenisers, engine and variant choice."""
