"""Training pipeline: prompt sets, base answers, annotation, SFT data, fine-tuning."""
