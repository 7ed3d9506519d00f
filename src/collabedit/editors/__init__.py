"""Knowledge-editing back-ends, chosen by name."""
