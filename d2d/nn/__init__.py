"""The modules d2d inserts into a model, and how they are routed."""
