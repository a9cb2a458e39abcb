"""The toy-world continual concept benchmark (issue #5); see README.md."""
