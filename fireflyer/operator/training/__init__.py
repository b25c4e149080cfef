"""The TrainingJob controller: an indexed Job per attempt, whole-job restarts."""
