"""crossrank training: fine-tune, evaluate and export cross-encoders into crossrank model dirs."""
