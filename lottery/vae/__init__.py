"""The VAE neuron-pruning study: a side study with its own directory (`vae-<hash>/`)."""
