"""The diffusion maths: noise schedules, losses' weights, noising, and the UNet builders."""
