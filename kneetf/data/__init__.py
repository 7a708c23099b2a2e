"""Data: built-in synthetic knees, the TFRecord cache and the tf.data pipeline."""
