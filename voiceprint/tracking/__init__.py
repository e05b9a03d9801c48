"""MLflow: evaluation and training runs, and the trained encoder registered as a pyfunc model.
The only part of the package that imports MLflow."""
