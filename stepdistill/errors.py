"""User-facing errors: one line that says what was wrong and how to fix it."""


class StepdistillError(Exception):
    """Bad input (config, path, model, data). The CLI prints it as one line, without a traceback."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training at a step boundary, after a checkpoint was written.

    The CLI exits with `exit_code`: 130 for SIGINT, 143 for SIGTERM (128 + the signal number, as a shell reports a
    process killed by it), after the trainer has printed where the checkpoint is."""

    def __init__(self, signum: int, step: int, checkpoint):
        import signal

        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {self.signal_name} at step {step}: checkpoint {checkpoint}; "
                         "resume with train.resume=latest")
