"""The one training engine, inference, metrics and checkpoint IO shared by every method."""
