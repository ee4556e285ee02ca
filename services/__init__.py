"""The four agentbus processes, each a small program on the agentbus library."""
