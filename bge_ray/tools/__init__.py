"""Training-data tools on Ray Data: hard negatives (mine) and teacher scores (score)."""
