"""Every collective the optimizer issues, failure naming, start-up agreement, parameter gathers."""
