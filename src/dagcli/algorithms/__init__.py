"""Training objectives: DAG-DB and DAG-KL (GFlowNet), DDPO (RL baseline), and the flow network."""
