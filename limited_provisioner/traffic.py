from .proxy import Execution, OutputBudget, Traffic  # TEMP
