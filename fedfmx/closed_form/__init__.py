"""The closed-form (analytic) head: summed feature statistics, fixed feature maps, FRES."""
