"""Users and creators: vectorised choice models, state dynamics, arrivals/churn, creator adaptation."""
