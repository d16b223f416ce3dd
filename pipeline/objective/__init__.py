"""The DIM objective: MI estimators, critics, negatives across devices, the loss."""
