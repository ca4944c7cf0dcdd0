"""What training needs besides the model: modes, typed settings, budgets, schedules, norm re-estimation and the LightningModule."""
