"""Reading, checking, splitting, mining and batching the pairs: everything between a user's files and a step's tensors."""
