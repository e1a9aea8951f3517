"""Domain adapters: where tokens live in each kind of model.

Each adapter imports its host library lazily and says which extra to install when it is missing.
No adapter imports another; what two adapters share lives in the core.
"""
