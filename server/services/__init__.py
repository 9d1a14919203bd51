"""Services the routes adapt to their wire formats (generation; see ARCHITECTURE.md)."""
