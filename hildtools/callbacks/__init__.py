"""Lightning callbacks: schedule + probe + metric + log."""
