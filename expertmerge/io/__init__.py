"""Checkpoint IO: where a model folder comes from, the lazy reader, the one streaming writer, the files beside
the weights, the atomic output folder and the merge card. Every export goes through here."""
