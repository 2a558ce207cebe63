"""Full screens of the memchat TUI."""
