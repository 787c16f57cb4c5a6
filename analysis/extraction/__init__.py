"""Forward passes: attention entropy and attention mass of every head for every prompt."""
