"""The job model: the spec a client submits, the states a job moves through, the result it ends with."""
