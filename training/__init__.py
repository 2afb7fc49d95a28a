"""Training code for the models this project makes itself (the `toy` InstructPix2Pix)."""
