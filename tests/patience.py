"""How long a test waits for a process, a file or a port: long enough for a loaded machine (load 10 on 2 cores runs
everything several times slower), so that a busy machine makes the suite slower, never red. The ceiling only ends
a hang; every wait returns as soon as its condition holds."""

PATIENCE_S = 1200
