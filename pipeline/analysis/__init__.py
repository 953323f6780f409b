"""Reading and summarising the jobs' outputs for people: the notebooks' logic, as plain
functions over files and Arrow tables (no Ray), each tested on real job outputs."""
