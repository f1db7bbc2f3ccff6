"""Model definitions (target decoder, DSpark drafter) and how to find and load them."""
