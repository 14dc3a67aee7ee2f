"""The `align` command line: the layer above alignment/ (the core), rewards/ and trainers/."""
