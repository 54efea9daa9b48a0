"""The declared Kafka topology: topics, consumer groups and the flow between them,
and the admin operations that make a cluster match it."""
