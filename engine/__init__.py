"""elbo-engine: a hand-written training engine for variational inference."""
