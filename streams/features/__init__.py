"""Feature computation: incremental indicators shared by the streaming agent and the offline batch path."""
