"""torch.fx graph passes: model/graph -> sites -> plan -> rewritten graph. Nothing here knows about Triton."""
